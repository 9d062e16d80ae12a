"""Logic shared by the stages: params, file I/O, data tables and model loading."""

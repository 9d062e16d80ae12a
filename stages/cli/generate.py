"""generate: write text with an exported (or trained) causal-lm adapter.

    python -m stages.cli.generate --model models/export "ROMEO:" "First Citizen:"
    qlora-generate --model models/export --max-new-tokens 100 --greedy "ROMEO:"
    qlora-generate --model models/export --chat "What is the topic of ...?"   (sft adapters)

Each prompt's continuation is printed after a `--- <prompt>` line: exactly --max-new-tokens
tokens, sampled with a fixed --seed (the same command prints the same text) or greedy. The
defaults are the generate.* params the adapter's evaluate samples used (params.yaml).
Each --chat message is sent as a user turn through the adapter's chat template (as training
rendered its examples), and the reply printed after a `--- <message>` line: greedy, up to
--max-new-tokens, stopping at eos, as evaluate's exact-match answers are.
"""

from __future__ import annotations

import argparse
import sys

from stages.lib.adapter import load_language_model
from stages.lib.answers import generate_answers
from stages.lib.io import run_main
from stages.lib.params import UserError
from stages.lib.quantized import autocast, memory_hint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported bundle or adapter directory (causal-lm)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature when sampling")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    parser.add_argument("--chat", action="append", default=[], metavar="MESSAGE",
                        help="a user message to answer through the chat template (repeatable; sft adapters)")
    parser.add_argument("prompts", nargs="*", help="texts to continue")
    args = parser.parse_args(argv)

    def work() -> None:
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: expected int >= 1, got {args.max_new_tokens}")
        if args.temperature <= 0:
            raise UserError(f"--temperature: expected float > 0, got {args.temperature}")
        if args.top_k < 0:
            raise UserError(f"--top-k: expected int >= 0, got {args.top_k}")
        if not args.prompts and not args.chat:
            raise UserError("nothing to generate: give prompts to continue or --chat messages")
        lm = load_language_model(args.model)
        if args.chat and not getattr(lm.tokenizer, "chat_template", None):
            raise UserError(f"--chat: {args.model} has a {lm.task} adapter whose tokenizer has no chat "
                            "template (sft adapters carry one)")
        if args.chat:
            with memory_hint("--max-new-tokens", args.max_new_tokens), autocast(lm.device, lm.dtype):
                replies = generate_answers(lm.model, lm.tokenizer, [[{"role": "user", "content": m}] for m in args.chat],
                                           args.max_new_tokens, batch_size=len(args.chat))
            for message, reply in zip(args.chat, replies):
                print(f"--- {message}\n{reply}")
        if not args.prompts:
            return
        with memory_hint("--max-new-tokens", args.max_new_tokens):
            texts = lm.generate(args.prompts, args.max_new_tokens, do_sample=not args.greedy,
                                temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        for prompt, text in zip(args.prompts, texts):
            print(f"--- {prompt}\n{prompt}{text}")

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())

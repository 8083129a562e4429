"""A trainer's resident memory and step time per PEFT method, on a model large enough for the
weights to dominate: a random Llama of about 340M parameters (hidden 1,536, 12 layers) behind the
tiny character tokenizer, built once under --model, then a few SFT steps of the built-in task per
method through the real stage (one DeepSpeed rank in a Ray actor).

    .venv/bin/python benchmarks/peft_memory.py --methods lora,qlora

One JSON line per method: the trainer's resident memory after its last step and its peak (the
process's, loading included), and each step's seconds.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def build(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayrlhf.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=4096,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,qlora", help="peft methods, comma-separated")
    parser.add_argument("--model", default="/tmp/rayrlhf_peft_memory/model")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    import ray

    from rayrlhf.config import load_config
    from rayrlhf.supervised import train_supervised

    model, out = Path(args.model), Path(args.model).parent
    if not (model / "config.json").exists():
        build(model)
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    for method in args.methods.split(","):
        run_dir = out / f"sft-{method}"
        train_supervised("sft", load_config("conf/tiny_pipeline.yaml", [
            f"model.path={model}", "model.build_tiny=false", f"output_dir={run_dir}",
            f"sft.max_steps={args.steps}", "sft.batch_size=8", "sft.micro_batch_size=8", "sft.eval_every=0",
            f"sft.peft.method={method}", "sft.data.synthetic_size=256",
            *(["sft.zero_stage=0"] if method == "adalora" else [])], stage="sft"))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"method": method, "rss_gib": round(rows[-1]["memory/sft_rss_gib"], 3),
                          "rss_peak_gib": round(rows[-1]["memory/sft_rss_peak_gib"], 3),
                          "step_s": [round(r["time/train"], 2) for r in rows]}), flush=True)


if __name__ == "__main__":
    main()

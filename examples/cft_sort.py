"""CFT on the synthetic sort task: the smallest end-to-end use of ``BlockDiffusionTrainer`` in a TRL script.

    python examples/cft_sort.py --output_dir runs/cft-sort --max_steps 200 --use_cpu
    accelerate launch --num_processes 2 --cpu examples/cft_sort.py --output_dir runs/cft-sort-ddp --max_steps 50

It builds a tiny Qwen3 from a config, converts it to block diffusion (block size 4), trains it with the masked
block-diffusion objective and decodes a few prompts with the parallel sampler at tau=0.9.
"""

from dataclasses import dataclass, field

from trl import TrlParser

from diffgr2_trl.block_diffusion import BlockDiffusionSampler, convert_to_block_diffusion, left_pad
from diffgr2_trl.modeling import build_model
from diffgr2_trl.synthetic import sort_dataset, sort_tokenizer
from diffgr2_trl.trainers import BlockDiffusionConfig, BlockDiffusionTrainer


@dataclass
class ExampleArguments:
    num_examples: int = field(default=2000, metadata={"help": "Training examples."})
    model_block_size: int = field(default=4, metadata={"help": "Block size of the conversion."})


def main() -> None:
    example_args, args = TrlParser((ExampleArguments, BlockDiffusionConfig)).parse_args_and_config()
    tok = sort_tokenizer()
    model = build_model("qwen3", tokenizer=tok, shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    convert_to_block_diffusion(model, tok, block_size=example_args.model_block_size)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=sort_dataset(example_args.num_examples),
                                    processing_class=tok)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tok.save_pretrained(args.output_dir)
        prompts = sort_dataset(4, seed=1)["prompt"]
        ids, am = left_pad([tok(p, add_special_tokens=False).input_ids for p in prompts], tok.pad_token_id)
        out = BlockDiffusionSampler(trainer.model.eval()).generate(ids, am, max_new_tokens=16, tau=0.9)
        for p, c in zip(prompts, tok.batch_decode(out.completion_ids, skip_special_tokens=True)):
            print(f"{p}-> {c}")
        print(f"tokens per forward: {out.tokens_per_forward:.2f}")


if __name__ == "__main__":
    main()

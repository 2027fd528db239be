"""Fine-tuning finished runs on instructions with LitGPT's own `finetune_lora` / `finetune_full`."""

"""Fine-tuning: LoRA adapters trained from a JSONL dataset on the base model, as a CLI
command (`llmos finetune`) or as a kernel job the server runs at low CPU priority."""

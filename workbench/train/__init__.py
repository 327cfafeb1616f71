"""Training: data, the loop shared by pretrain and finetune, distributed training, and Optuna tuning."""

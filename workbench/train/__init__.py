"""Training: mixing (Eq. 1), data, the loop shared by pretrain and finetune, and Optuna tuning."""

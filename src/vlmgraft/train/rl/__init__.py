"""Post-training stages on TRL's trainers (DPO, GRPO, CHORD) and the reward functions GRPO scores rollouts with."""

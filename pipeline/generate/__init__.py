"""Generation stage: synthesize the faces of people who do not exist (StyleGAN2-ADA)."""

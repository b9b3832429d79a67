"""Training on curated SWiRL data: dataset export, the judge-backed reward, SFT and SWiRL RL (TRL)."""

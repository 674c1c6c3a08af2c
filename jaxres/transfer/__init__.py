"""Transfer to new tasks: `features` (a cached, jitted feature pass of any named layer),
`probe` (ridge and logistic regression in JAX), `sampling` (the protocols' seeded draws),
`runner` (features once, then every N x trial x probe) and `report` (tables, files, confusion)."""

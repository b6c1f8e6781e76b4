"""The CPU's share of the streamed layers: packing, split weights, the balancer, sizing for the
plan, the CPU's experts and their split against the copies, and the one factory the compute
process calls (NOTE [ the CPU share ] in share.py, NOTE [ CPU experts ] in experts.py, NOTE
[ the experts' split ] in expert_split.py)."""

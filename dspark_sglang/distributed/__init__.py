"""Tensor parallelism over ``torch.distributed``: process groups, sharded layers, the driver."""

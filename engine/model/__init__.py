"""LLaVA on megatron-core: `llava.build_model` builds one pipeline stage; `specs` picks the kernels;
`attention` holds the packed-document attention; `vision` the CLIP tower; `sharding` moves full
(unsharded) state dicts in and out of a tensor/pipeline-parallel model."""

"""Everything that touches Transformers: the attention function and the config attribute (`attention`, `flags`),
where attention modules sit (`sites`), the on/off switch (`switch`), the consistency trainer (`trainer`), model
cards (`model_card`) and version-gated workarounds (`_compat`)."""

"""The patch rules, one module per model family. :mod:`monkey_kernels.patching` (the engine) imports every module
of this package whose name does not start with ``_`` on the first ``patch_model`` / ``unpatch_model`` /
``register_rule`` call; each registers its :class:`~monkey_kernels.patching.PatchRule` s on import.

- :mod:`.monkey_vit`: Monkey's vision transformer (blocks, the ``resblocks`` container, ``MonkeyVisionModel``);
- :mod:`.monkey_vlm`: the full Monkey VLM (``MonkeyLMHeadModel`` of the public remote code);
- :mod:`.peft_lora`: HuggingFace PEFT LoRA ``Linear`` layers, with per-row adapter selection;
- :mod:`.slp_embedding`: LayTextLLM-style SLP embedding layers;
- :mod:`.plora`: InternLM-XComposer's Partial LoRA (image tokens only), with a PEFT LoRA stacked on it;
- :mod:`.textmonkey`, :mod:`.textmonkey_vlm`: TextMonkey's windowed encoder and its VLM.

To add a family, add a module here, and its tests under ``tests/models/``. The module:

- states in its docstring what it recognises (by structure, so users' copies of public code are patched too),
  the call contract of what it replaces, and what its fused forward does;
- recognises by structure AND checks the call contract (signature, keywords, call pattern: see
  :mod:`monkey_kernels.call_contract`; the Monkey family's structure is :mod:`monkey_kernels.monkey_structure`); a module it recognises but cannot run is left alone with a reason
  (``skip_reason``) -- never a patched model that fails on its first forward;
  :meth:`monkey_kernels.patching.PatchRule.by_structure` builds both from ``looks_like(module)`` and
  ``problem(module)``;
- stacks adapters with :class:`monkey_kernels.adapter_stack.AdapterStack` and maps a batch's ids with
  :func:`monkey_kernels.adapter_stack.remap_adapter_ids`; installs in-place forwards as
  :class:`monkey_kernels.patching.InstanceForward` (picklable);
- registers its rules with :func:`monkey_kernels.patching.register_builtin_rule` and declares their order
  with ``after=`` (rules whose fused modules it needs) and a one-line ``description``;
- imports its optional dependencies lazily (importing every rule module must stay cheap: patching an SLP layer
  does not import transformers or PEFT).
"""

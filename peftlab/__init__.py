"""peftlab: the helper library of the peftlab workbook on fine-tuning LLMs, above all parameter-efficient
fine-tuning (PEFT). The notebooks derive each method; this package holds the code they share.

Modules: ``env`` (profile, device, seed), ``models`` (base models), ``data`` (data sets, masking, collators),
``train`` (the training loop), ``params`` (parameter reports), ``methods`` (one module per PEFT family).
"""

__version__ = "0.1.0"

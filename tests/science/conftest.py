"""The fine-tuning fixtures (random toy teacher, pruned students, in-process `safeprune finetune`), shared."""

from finetune.conftest import fast_flags, finetune_cli, magnitude_student, student_dir, toy_teacher  # noqa: F401

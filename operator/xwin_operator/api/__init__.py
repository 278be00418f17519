# The AlignmentRun API: the spec model, reading files with line numbers, the generated CRD.

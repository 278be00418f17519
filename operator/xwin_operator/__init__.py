# The `xwin` CLI and the AlignmentRun operator: api/ (the resource), core/ (the pure planner),
# kube/ (the Kubernetes executor), local/ (the `xwin run` executor), cli.py.

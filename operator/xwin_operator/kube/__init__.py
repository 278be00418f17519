# The Kubernetes executor: manifests from planned children, the kopf handlers, the client calls.

# The local executor (`xwin run`): planned children as local processes and vLLM servers.

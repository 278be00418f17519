# The pure core: stage tasks and steps, the planned children, the planner (types, decide), status.
# It imports nothing from kube/ or local/, nor kopf, kubernetes, aiohttp, torch or boto3.

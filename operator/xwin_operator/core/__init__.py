# The pure core: stage graph, stage tasks and steps, the planner (types, decide), status.
# It imports nothing from kube/ or local/, nor kopf, kubernetes, aiohttp, torch or boto3.

import os

# A fixed thread count makes the planner's split decisions (and so the workspace a plan
# needs) the same on every machine. Read once, when flashpage first runs.
os.environ.setdefault("FLASHPAGE_NUM_THREADS", "4")

"""facechange's model pipeline: detect -> select -> generate -> swap, with no Telegram inside."""

import os

# OpenMP threads spin while they wait for each other by default. On a shared or small machine
# (2 cores, a bot's worker beside other processes) a descheduled thread then stalls every
# barrier: measured here, RetinaFace on a 1024 px photo took 5.3 s instead of 0.32 s with two
# threads on a loaded CPU. Passive waiting costs nothing measurable on a quiet machine. This
# must run before torch loads its OpenMP runtime, hence here; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

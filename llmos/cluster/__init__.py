"""llmos past one machine: engine replicas as Ray actors behind a prefix- and load-aware
router with failover (`llmos serve --cluster`)."""

#!/usr/bin/env bash
# Versions and schedules end to end, through the CLI: two versions, a promotion, locked and
# unlocked triggers, a schedule firing, two refusals. Start a server first, e.g.
#   runlane serve --listen 127.0.0.1:7979 --data /tmp/rl-demo   (prints an admin key)
# then: RUNLANE_KEY=rl_... docs/examples/versions_and_schedules.sh (run it in a scratch folder:
# it writes v1.json, v2.json and bad.json there).
set -u
B=${RUNLANE_BIN:-runlane}
export RUNLANE_SERVER=http://127.0.0.1:7979
show() { echo "\$ runlane $*"; $B "$@"; echo "(exit $?)"; }
cat > v1.json <<'J'
{"tasks": [{"name": "email", "queue": "mail", "queue_limit": 2, "retry": {"attempts_max": 3}}]}
J
cat > v2.json <<'J'
{"tasks": [
  {"name": "email", "queue": "mail", "queue_limit": 4, "retry": {"attempts_max": 5}},
  {"name": "report", "schedules": [{"cron": "*/5 * * * * *", "timezone": "America/New_York"}]}
]}
J
show env create shop
show versions register --env shop --file v1.json
show versions register --env shop --file v2.json
show versions list --env shop
show versions promote --env shop 1
show trigger --env shop email --payload '{"to":"a@example.com"}'
show versions promote --env shop 2
show trigger --env shop email --payload '{"to":"b@example.com"}'
show trigger --env shop email --version 1 --payload '{"to":"c@example.com"}'
show runs list --env shop --version 1 --json
show queues list --env shop
show schedules list --env shop
echo "(waiting 6 s for a tick)"; sleep 6
show runs list --env shop --source scheduled
show runs list --env shop --version 1
show runs list --env shop --version 2
bad='{"tasks": [{"name": "x", "schedules": [{"cron": "61 * * * *"}]}]}'
echo "$bad" > bad.json
show versions register --env shop --file bad.json
show versions promote --env shop 9

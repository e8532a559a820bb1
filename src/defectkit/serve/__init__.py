"""On the line: inspection service (app), results store, SPC and drift alarms,
review export and dashboard. See README.md, section "On the line"."""

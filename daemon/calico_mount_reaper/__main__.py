from calico_mount_reaper.cli import main

raise SystemExit(main())

from tokshard.jobs.cli import main

raise SystemExit(main())

from transferkit.cli import main

raise SystemExit(main())

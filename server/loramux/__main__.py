from loramux.cli import main

raise SystemExit(main())

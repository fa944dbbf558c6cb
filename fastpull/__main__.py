from fastpull.cli import main

raise SystemExit(main())

from fastjac.cli import main

raise SystemExit(main())

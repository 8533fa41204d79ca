from fusedtrain.cli import main

raise SystemExit(main())

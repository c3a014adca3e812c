"""``python -m clipguard.provenance --label ai_generated FILES``: lines for a hash list."""

from clipguard.provenance.hashlist import main

raise SystemExit(main())

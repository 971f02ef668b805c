//! Lists: sort, search, keyset pages.

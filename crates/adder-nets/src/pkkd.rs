//! PKKD (todo)

pub mod format;
pub mod fsutil;

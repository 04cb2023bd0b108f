//! Legacy PC devices on the port I/O bus.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod serial;

//! A minimal MC146818 CMOS RTC: the wall-clock time in BCD, "update not in progress", and
//! a valid-RAM flag. Linux reads it once for the boot time; without it, guests poll the
//! missing chip thousands of times (a costly exit each on a nested host).

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// CMOS bytes beyond the clock: plain storage, as guests may use them.
const CMOS_SIZE: usize = 128;

#[derive(Debug, thiserror::Error)]
#[error("saved CMOS RAM is {0} bytes, not {CMOS_SIZE}")]
pub struct CmosStateError(usize);

/// What a snapshot keeps of the CMOS: the selected register and the RAM bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub ram: Vec<u8>,
}

#[derive(Default)]
pub struct Cmos {
    index: u8,
    ram: Vec<u8>,
}

impl Cmos {
    pub fn new() -> Self {
        Self {
            index: 0,
            ram: vec![0; CMOS_SIZE],
        }
    }

    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.clone(),
        }
    }

    /// The saved chip. The clock registers always read the host's time: a restored guest
    /// reads the wall clock of the day it is restored, as after a real suspend.
    pub fn restore(state: &CmosState) -> Result<Self, CmosStateError> {
        if state.ram.len() != CMOS_SIZE {
            return Err(CmosStateError(state.ram.len()));
        }
        Ok(Self {
            index: state.index & 0x7f,
            ram: state.ram.clone(),
        })
    }

    fn read_register(&self, reg: u8) -> u8 {
        let now = civil_now();
        match reg {
            REG_SECONDS => bcd(now.second),
            REG_MINUTES => bcd(now.minute),
            REG_HOURS => bcd(now.hour),
            REG_WEEKDAY => bcd(now.weekday + 1),
            REG_DAY => bcd(now.day),
            REG_MONTH => bcd(now.month),
            REG_YEAR => bcd((now.year % 100) as u8),
            REG_CENTURY => bcd((now.year / 100) as u8),
            // 32.768 kHz divider, no update in progress.
            REG_A => 0x26,
            // 24-hour mode, BCD, no interrupts.
            REG_B => 0x02,
            REG_C => 0,
            // Valid RAM and time.
            REG_D => 0x80,
            other => self.ram.get(usize::from(other)).copied().unwrap_or(0),
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 1 && data.len() == 1 {
            data[0] = self.read_register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 of the index port masks NMIs; the index is the low 7 bits.
            0 => self.index = data[0] & 0x7f,
            1 if self.index > REG_D && self.index != REG_CENTURY => {
                if let Some(byte) = self.ram.get_mut(usize::from(self.index)) {
                    *byte = data[0];
                }
            }
            _ => {}
        }
    }
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

struct CivilTime {
    year: u32,
    month: u8,
    day: u8,
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

fn civil_now() -> CivilTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_from_unix(secs)
}

/// UTC calendar fields from Unix seconds (days-from-civil inverse, proleptic Gregorian).
fn civil_from_unix(secs: u64) -> CivilTime {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // 1970-01-01 was a Thursday (weekday 4 with Sunday = 0).
    let weekday = ((days + 4) % 7) as u8;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    CivilTime {
        year,
        month,
        day,
        weekday,
        hour: (rem / 3600) as u8,
        minute: ((rem % 3600) / 60) as u8,
        second: (rem % 60) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_conversion() {
        // 2026-12-01 14:52:01 UTC, a Tuesday.
        let t = civil_from_unix(1_796_136_721);
        assert_eq!((t.year, t.month, t.day), (2026, 12, 1));
        assert_eq!((t.hour, t.minute, t.second), (14, 52, 1));
        assert_eq!(t.weekday, 2);
        let leap = civil_from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn registers_through_the_ports() {
        let mut cmos = Cmos::new();
        let mut byte = [0u8];
        cmos.write(0, &[0x80 | REG_D]);
        cmos.read(1, &mut byte);
        assert_eq!(byte[0], 0x80);
        cmos.write(0, &[REG_A]);
        cmos.read(1, &mut byte);
        assert_eq!(byte[0] & 0x80, 0, "update-in-progress must be clear");
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        cmos.read(1, &mut byte);
        assert_eq!(byte[0], 0x5a);
        assert_eq!(bcd(59), 0x59);
    }

    #[test]
    fn saved_ram_and_index_come_back() {
        let mut cmos = Cmos::new();
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        let mut restored = Cmos::restore(&cmos.save()).unwrap();
        let mut byte = [0u8];
        restored.read(1, &mut byte);
        assert_eq!(byte[0], 0x5a, "the selected register and its byte");
        let short = CmosState {
            index: 0,
            ram: vec![0; 3],
        };
        assert_eq!(
            Cmos::restore(&short).err().unwrap().to_string(),
            "saved CMOS RAM is 3 bytes, not 128"
        );
    }
}

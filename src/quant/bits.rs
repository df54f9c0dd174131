//! Bit widths: what a quantizer's code range is made of.

use crate::error::{Error, Result};
use crate::gpu::DType;

/// A validated bit width: 2..=16, or 32 for float (no quantization).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Bits(u32);

impl Bits {
    pub const FLOAT: Bits = Bits(32);
    pub const EIGHT: Bits = Bits(8);

    pub fn new(bits: u32) -> Result<Bits> {
        match bits {
            2..=16 | 32 => Ok(Bits(bits)),
            1 => Err(Error::Invalid(
                "1-bit quantization is not supported: DoReFa and IAO have no binary mode; use 2 to 16 bits, or 32 for float"
                    .into(),
            )),
            _ => Err(Error::Invalid(format!(
                "{bits} bits is not supported: use 2 to 16 bits, or 32 for float"
            ))),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn is_float(self) -> bool {
        self.0 == 32
    }

    /// `n = 2^bits - 1`, the largest code.
    pub fn levels(self) -> u32 {
        (1u32 << self.0.min(31)) - 1
    }

    /// `fl32(1/n)`: the double `1/n` rounded once to f32, as PyTorch multiplies by it.
    pub fn inv_levels(self) -> f32 {
        (1.0f64 / self.levels() as f64) as f32
    }

    /// The element type of integer codes: four 8-bit codes per word up to 8 bits, else a word each.
    pub fn code_dtype(self) -> DType {
        if self.0 <= 8 { DType::U8x4 } else { DType::U32 }
    }
}

impl TryFrom<u32> for Bits {
    type Error = Error;
    fn try_from(v: u32) -> Result<Bits> {
        Bits::new(v)
    }
}

impl From<Bits> for u32 {
    fn from(b: Bits) -> u32 {
        b.0
    }
}

impl std::fmt::Display for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_accept_2_to_16_and_32_only() {
        for b in (2..=16).chain([32]) {
            assert!(Bits::new(b).is_ok());
        }
        let e = Bits::new(1).unwrap_err().to_string();
        assert!(e.contains("binary") && e.contains("2 to 16"), "{e}");
        for b in [0, 17, 31, 33, 64] {
            assert!(
                Bits::new(b)
                    .unwrap_err()
                    .to_string()
                    .contains(&format!("{b} bits"))
            );
        }
        assert_eq!(Bits::new(8).unwrap().levels(), 255);
        assert_eq!(Bits::new(8).unwrap().inv_levels(), (1.0f64 / 255.0) as f32);
        assert_eq!(Bits::new(16).unwrap().code_dtype(), DType::U32);
    }
}

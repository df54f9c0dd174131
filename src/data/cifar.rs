//! The CIFAR-10 binary format: files of records, each 1 label byte and 3072 pixel bytes (CHW).
//! `data_batch_*.bin` (whichever are present) are the training set, `test_batch.bin` the test set.

use super::{CLASSES, Dataset, IMAGE_BYTES, RECORD_BYTES};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Parses records, checking the size and every label.
pub fn parse(bytes: &[u8], origin: &Path) -> Result<Dataset> {
    if bytes.is_empty() {
        return Err(Error::file(
            origin,
            "is empty: a CIFAR-10 batch file holds 3073-byte records",
        ));
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(Error::file(
            origin,
            format!(
                "is {} bytes, not a multiple of the 3073-byte record (truncated or not a CIFAR-10 binary file?): download it again",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / RECORD_BYTES;
    let mut d = Dataset {
        images: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        if rec[0] as usize >= CLASSES {
            return Err(Error::file(
                origin,
                format!(
                    "record {i} has label {}, but CIFAR-10 labels are 0 to 9",
                    rec[0]
                ),
            ));
        }
        d.labels.push(rec[0]);
        d.images.extend_from_slice(&rec[1..]);
    }
    Ok(d)
}

fn read(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, path)
}

/// The folder holding the batch files: `dir` itself, or `dir/cifar-10-batches-bin`.
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            "is not a folder: give as `data` the folder holding data_batch_*.bin and test_batch.bin (or its parent)",
        ));
    }
    let nested = dir.join("cifar-10-batches-bin");
    let has = |d: &Path| d.join("test_batch.bin").is_file() || d.join("data_batch_1.bin").is_file();
    if has(dir) {
        Ok(dir.to_path_buf())
    } else if has(&nested) {
        Ok(nested)
    } else {
        Err(Error::file(
            dir,
            "holds no CIFAR-10 binary files (data_batch_*.bin, test_batch.bin): download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there",
        ))
    }
}

/// Loads the training and test sets from `dir` (see [`resolve`]).
pub fn load(dir: &Path) -> Result<(Dataset, Dataset)> {
    let dir = resolve(dir)?;
    let mut train = Dataset::default();
    let mut found = 0;
    for i in 1..=5 {
        let p = dir.join(format!("data_batch_{i}.bin"));
        if p.is_file() {
            let d = read(&p)?;
            train.images.extend(d.images);
            train.labels.extend(d.labels);
            found += 1;
        }
    }
    if found == 0 {
        return Err(Error::file(
            &dir,
            "has no training files data_batch_1.bin ... data_batch_5.bin",
        ));
    }
    Ok((train, load_test(&dir)?))
}

/// Loads only the test set from `dir` (see [`resolve`]): evaluation needs no training files.
pub fn load_test(dir: &Path) -> Result<Dataset> {
    let dir = resolve(dir)?;
    let test_path = dir.join("test_batch.bin");
    if !test_path.is_file() {
        return Err(Error::file(&dir, "has no test_batch.bin (the test set)"));
    }
    read(&test_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes_and_labels_with_the_record_named() {
        let p = Path::new("x.bin");
        assert!(parse(&[], p).unwrap_err().to_string().contains("empty"));
        let e = parse(&[0; 3000], p).unwrap_err().to_string();
        assert!(e.contains("3000 bytes") && e.contains("3073"), "{e}");
        let mut two = vec![1u8; 2 * RECORD_BYTES];
        two[RECORD_BYTES] = 10;
        let e = parse(&two, p).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("label 10"), "{e}");
        two[RECORD_BYTES] = 9;
        let d = parse(&two, p).unwrap();
        assert_eq!((d.len(), d.labels[1]), (2, 9));
    }
}

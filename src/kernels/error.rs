//! The one error type of the kernels. The bindings map [`ErrorKind`] onto Python
//! exception classes; the message always names the argument, what was expected and
//! what came.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A size or rank that does not fit the others (Python `ValueError`).
    Shape,
    /// A hyper-parameter or option out of its range (Python `ValueError`).
    Value,
    /// A wrong element type (Python `TypeError`).
    Type,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub arg: String,
    pub expected: String,
    pub actual: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(
        kind: ErrorKind,
        arg: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Error { kind, arg: arg.into(), expected: expected.into(), actual: actual.into() }
    }
    pub fn shape(arg: impl Into<String>, expected: impl Into<String>, actual: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, arg, expected, actual)
    }
    pub fn value(arg: impl Into<String>, expected: impl Into<String>, actual: impl Into<String>) -> Self {
        Self::new(ErrorKind::Value, arg, expected, actual)
    }
    pub fn dtype(arg: impl Into<String>, expected: impl Into<String>, actual: impl Into<String>) -> Self {
        Self::new(ErrorKind::Type, arg, expected, actual)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: expected {}, got {}", self.arg, self.expected, self.actual)
    }
}

impl std::error::Error for Error {}

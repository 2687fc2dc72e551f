//! The one error type of Hafen. Every failure a client can see is an [`Error`]; this file is the
//! only place that maps it to a Matrix errcode and an HTTP status.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How every policy denial's message begins (`Denied by the <policy> policy: ...`).
pub const POLICY_DENIAL_PREFIX: &str = "Denied by the ";

/// Matrix error codes we emit. Kept as an enum so a typo cannot invent a new errcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrCode {
    Forbidden,
    UnknownToken,
    MissingToken,
    BadJson,
    NotJson,
    NotFound,
    LimitExceeded,
    Unrecognized,
    Unknown,
    UserInUse,
    InvalidUsername,
    RoomInUse,
    InvalidRoomState,
    UnsupportedRoomVersion,
    TooLarge,
    InvalidParam,
    MissingParam,
    UserDeactivated,
    Exclusive,
    GuestAccessForbidden,
    ServerNotTrusted,
    CannotLeaveServerNoticeRoom,
    UnableToAuthoriseJoin,
    UnableToGrantJoin,
    WeakPassword,
    Unauthorized,
    UserLocked,
    ProfileTooLarge,
    KeyTooLarge,
    BadAlias,
    InvalidSignature,
    CannotOverwriteMedia,
    NotYetUploaded,
    UserSuspended,
    /// Sliding sync: the `pos` is unknown or expired; the client starts a new connection.
    UnknownPos,
    /// 400: the room's version is not among those the joining server supports.
    IncompatibleRoomVersion,
    /// 400: an appservice ping to an appservice registered without `url`.
    UrlNotSet,
    /// 502: the appservice could not be reached.
    ConnectionFailed,
    /// 504: the appservice did not answer in time.
    ConnectionTimeout,
}

impl ErrCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrCode::Forbidden => "M_FORBIDDEN",
            ErrCode::UnknownToken => "M_UNKNOWN_TOKEN",
            ErrCode::MissingToken => "M_MISSING_TOKEN",
            ErrCode::BadJson => "M_BAD_JSON",
            ErrCode::NotJson => "M_NOT_JSON",
            ErrCode::NotFound => "M_NOT_FOUND",
            ErrCode::LimitExceeded => "M_LIMIT_EXCEEDED",
            ErrCode::Unrecognized => "M_UNRECOGNIZED",
            ErrCode::Unknown => "M_UNKNOWN",
            ErrCode::UserInUse => "M_USER_IN_USE",
            ErrCode::InvalidUsername => "M_INVALID_USERNAME",
            ErrCode::RoomInUse => "M_ROOM_IN_USE",
            ErrCode::InvalidRoomState => "M_INVALID_ROOM_STATE",
            ErrCode::UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            ErrCode::TooLarge => "M_TOO_LARGE",
            ErrCode::InvalidParam => "M_INVALID_PARAM",
            ErrCode::MissingParam => "M_MISSING_PARAM",
            ErrCode::UserDeactivated => "M_USER_DEACTIVATED",
            ErrCode::Exclusive => "M_EXCLUSIVE",
            ErrCode::GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            ErrCode::ServerNotTrusted => "M_SERVER_NOT_TRUSTED",
            ErrCode::CannotLeaveServerNoticeRoom => "M_CANNOT_LEAVE_SERVER_NOTICE_ROOM",
            ErrCode::UnableToAuthoriseJoin => "M_UNABLE_TO_AUTHORISE_JOIN",
            ErrCode::UnableToGrantJoin => "M_UNABLE_TO_GRANT_JOIN",
            ErrCode::WeakPassword => "M_WEAK_PASSWORD",
            ErrCode::Unauthorized => "M_UNAUTHORIZED",
            ErrCode::UserLocked => "M_USER_LOCKED",
            ErrCode::UserSuspended => "M_USER_SUSPENDED",
            ErrCode::ProfileTooLarge => "M_PROFILE_TOO_LARGE",
            ErrCode::KeyTooLarge => "M_KEY_TOO_LARGE",
            ErrCode::BadAlias => "M_BAD_ALIAS",
            ErrCode::InvalidSignature => "M_INVALID_SIGNATURE",
            ErrCode::CannotOverwriteMedia => "M_CANNOT_OVERWRITE_MEDIA",
            ErrCode::NotYetUploaded => "M_NOT_YET_UPLOADED",
            ErrCode::UnknownPos => "M_UNKNOWN_POS",
            ErrCode::IncompatibleRoomVersion => "M_INCOMPATIBLE_ROOM_VERSION",
            ErrCode::UrlNotSet => "M_URL_NOT_SET",
            ErrCode::ConnectionFailed => "M_CONNECTION_FAILED",
            ErrCode::ConnectionTimeout => "M_CONNECTION_TIMEOUT",
        }
    }

    /// The HTTP status the spec pairs with this errcode when nothing more specific applies.
    fn default_status(self) -> StatusCode {
        match self {
            ErrCode::Forbidden
            | ErrCode::GuestAccessForbidden
            | ErrCode::CannotLeaveServerNoticeRoom
            | ErrCode::UnableToGrantJoin
            | ErrCode::UserDeactivated
            | ErrCode::ServerNotTrusted => StatusCode::FORBIDDEN,
            ErrCode::UnknownToken | ErrCode::MissingToken | ErrCode::Unauthorized => {
                StatusCode::UNAUTHORIZED
            }
            ErrCode::UserLocked => StatusCode::UNAUTHORIZED,
            ErrCode::UserSuspended => StatusCode::FORBIDDEN,
            ErrCode::NotFound | ErrCode::Unrecognized => StatusCode::NOT_FOUND,
            ErrCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrCode::CannotOverwriteMedia => StatusCode::CONFLICT,
            ErrCode::NotYetUploaded => StatusCode::GATEWAY_TIMEOUT,
            ErrCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            ErrCode::ConnectionFailed => StatusCode::BAD_GATEWAY,
            ErrCode::ConnectionTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Matrix error with the default status for its errcode.
    #[error("{code:?}: {message}")]
    Matrix {
        code: ErrCode,
        message: String,
        status: StatusCode,
    },
    /// Rate limited; tells the client when to retry.
    #[error("rate limited, retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    /// An unknown or expired access token. `soft_logout` tells the client it may refresh.
    #[error("unknown token")]
    UnknownToken { soft_logout: bool },
    /// The account is locked: 401 `M_USER_LOCKED` with `soft_logout` (the client keeps its data
    /// and may log in again once unlocked).
    #[error("user locked")]
    UserLocked,
    /// A key backup write to a version that is not the current one (403, with the current one).
    #[error("wrong room keys version")]
    WrongRoomKeysVersion { current_version: Option<String> },
    /// The user must accept the current privacy notice first: 403 `M_CONSENT_NOT_GIVEN` with the
    /// page where they can (the errcode and field Synapse uses and Element understands).
    #[error("consent not given")]
    ConsentNotGiven { consent_uri: String },
    /// User-interactive authentication: the 401 body that lists flows and completed stages.
    #[error("user-interactive authentication required")]
    Uiaa(serde_json::Value),
    /// 502 `M_BAD_STATUS`: an appservice answered a ping with an error status (and this body).
    #[error("appservice answered {status}")]
    BadStatus { status: u16, body: String },
    /// A failure of ours (database, serialization of our own data). Logged, never detailed to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn new(code: ErrCode, message: impl Into<String>) -> Self {
        Error::Matrix {
            code,
            message: message.into(),
            status: code.default_status(),
        }
    }

    pub fn with_status(code: ErrCode, status: StatusCode, message: impl Into<String>) -> Self {
        Error::Matrix {
            code,
            message: message.into(),
            status,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrCode::NotFound, message)
    }
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(ErrCode::BadJson, message)
    }
    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(ErrCode::InvalidParam, message)
    }
    /// 400 `M_UNKNOWN`: a request the spec answers with no more specific code.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::with_status(ErrCode::Unknown, StatusCode::BAD_REQUEST, message)
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Error::Internal(message.to_string())
    }

    /// A denial by a policy (`policy::access::deny`): 403 `M_FORBIDDEN` whose message names the
    /// policy. Callers that reword auth-rule refusals leave these as they are, so the user and
    /// the tests see which policy said no.
    pub fn is_policy_denial(&self) -> bool {
        matches!(
            self,
            Error::Matrix { code: ErrCode::Forbidden, message, .. }
                if message.starts_with(POLICY_DENIAL_PREFIX)
        )
    }

    /// The errcode, for tests and logs.
    pub fn errcode(&self) -> &'static str {
        match self {
            Error::Matrix { code, .. } => code.as_str(),
            Error::RateLimited { .. } => "M_LIMIT_EXCEEDED",
            Error::UnknownToken { .. } => "M_UNKNOWN_TOKEN",
            Error::Uiaa(_) => "M_FORBIDDEN",
            Error::ConsentNotGiven { .. } => "M_CONSENT_NOT_GIVEN",
            Error::UserLocked => "M_USER_LOCKED",
            Error::WrongRoomKeysVersion { .. } => "M_WRONG_ROOM_KEYS_VERSION",
            Error::BadStatus { .. } => "M_BAD_STATUS",
            Error::Internal(_) => "M_UNKNOWN",
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Internal(format!("database: {e}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Internal(format!("json: {e}"))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Error::Matrix {
                code,
                message,
                status,
            } => (
                status,
                json!({ "errcode": code.as_str(), "error": message }),
            ),
            Error::RateLimited { retry_after_ms } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too many requests",
                    "retry_after_ms": retry_after_ms,
                }),
            ),
            Error::UnknownToken { soft_logout } => (
                StatusCode::UNAUTHORIZED,
                json!({
                    "errcode": "M_UNKNOWN_TOKEN",
                    "error": "Unknown or expired access token",
                    "soft_logout": soft_logout,
                }),
            ),
            Error::Uiaa(body) => (StatusCode::UNAUTHORIZED, body),
            Error::ConsentNotGiven { consent_uri } => (
                StatusCode::FORBIDDEN,
                json!({
                    "errcode": "M_CONSENT_NOT_GIVEN",
                    "error": format!("Please review and accept the privacy notice at {consent_uri} to continue"),
                    "consent_uri": consent_uri,
                }),
            ),
            Error::UserLocked => (
                StatusCode::UNAUTHORIZED,
                json!({
                    "errcode": "M_USER_LOCKED",
                    "error": "This account has been locked",
                    "soft_logout": true,
                }),
            ),
            Error::WrongRoomKeysVersion { current_version } => (
                StatusCode::FORBIDDEN,
                json!({
                    "errcode": "M_WRONG_ROOM_KEYS_VERSION",
                    "error": "This is not the current backup version",
                    "current_version": current_version,
                }),
            ),
            Error::BadStatus { status, body } => (
                StatusCode::BAD_GATEWAY,
                json!({
                    "errcode": "M_BAD_STATUS",
                    "error": "The appservice answered with an error status",
                    "status": status,
                    "body": body,
                }),
            ),
            Error::Internal(message) => {
                tracing::error!(%message, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "errcode": "M_UNKNOWN", "error": "Internal server error" }),
                )
            }
        };
        crate::api::json_response(status, &body)
    }
}

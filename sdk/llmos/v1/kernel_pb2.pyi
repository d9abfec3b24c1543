from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_STATE_UNSPECIFIED: _ClassVar[ProcessState]
    RUNNABLE: _ClassVar[ProcessState]
    RUNNING: _ClassVar[ProcessState]
    BLOCKED: _ClassVar[ProcessState]
    EXITED: _ClassVar[ProcessState]
    KILLED: _ClassVar[ProcessState]
    CRASHED: _ClassVar[ProcessState]

class ProcessKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_KIND_UNSPECIFIED: _ClassVar[ProcessKind]
    LUA: _ClassVar[ProcessKind]
    PYTHON: _ClassVar[ProcessKind]
    PORT: _ClassVar[ProcessKind]
PROCESS_STATE_UNSPECIFIED: ProcessState
RUNNABLE: ProcessState
RUNNING: ProcessState
BLOCKED: ProcessState
EXITED: ProcessState
KILLED: ProcessState
CRASHED: ProcessState
PROCESS_KIND_UNSPECIFIED: ProcessKind
LUA: ProcessKind
PYTHON: ProcessKind
PORT: ProcessKind

class Limits(_message.Message):
    __slots__ = ("cpu_ms", "wall_ms", "memory_bytes", "tokens", "mailbox", "mailbox_bytes", "processes", "kv_bytes")
    CPU_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_ms: int
    wall_ms: int
    memory_bytes: int
    tokens: int
    mailbox: int
    mailbox_bytes: int
    processes: int
    kv_bytes: int
    def __init__(self, cpu_ms: _Optional[int] = ..., wall_ms: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., mailbox: _Optional[int] = ..., mailbox_bytes: _Optional[int] = ..., processes: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("cpu_ms", "wall_ms", "messages_sent", "messages_received", "tokens", "memory_bytes", "mailbox_len", "mailbox_bytes", "processes", "kv_bytes")
    CPU_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_LEN_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_ms: int
    wall_ms: int
    messages_sent: int
    messages_received: int
    tokens: int
    memory_bytes: int
    mailbox_len: int
    mailbox_bytes: int
    processes: int
    kv_bytes: int
    def __init__(self, cpu_ms: _Optional[int] = ..., wall_ms: _Optional[int] = ..., messages_sent: _Optional[int] = ..., messages_received: _Optional[int] = ..., tokens: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., mailbox_len: _Optional[int] = ..., mailbox_bytes: _Optional[int] = ..., processes: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class SpawnRequest(_message.Message):
    __slots__ = ("lua", "python", "path", "args", "name", "priority", "limits", "parent", "monitor", "weight", "source_name", "dead_letter", "max_attempts", "durable")
    LUA_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    MONITOR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    lua: str
    python: str
    path: str
    args: _struct_pb2.Value
    name: str
    priority: int
    limits: Limits
    parent: int
    monitor: bool
    weight: int
    source_name: str
    dead_letter: int
    max_attempts: int
    durable: bool
    def __init__(self, lua: _Optional[str] = ..., python: _Optional[str] = ..., path: _Optional[str] = ..., args: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., name: _Optional[str] = ..., priority: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., parent: _Optional[int] = ..., monitor: _Optional[bool] = ..., weight: _Optional[int] = ..., source_name: _Optional[str] = ..., dead_letter: _Optional[int] = ..., max_attempts: _Optional[int] = ..., durable: _Optional[bool] = ...) -> None: ...

class SpawnResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "to", "tag", "body", "data", "correlation_id", "sent_at_ms", "attempt", "redelivered")
    ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REDELIVERED_FIELD_NUMBER: _ClassVar[int]
    id: int
    to: int
    tag: str
    body: _struct_pb2.Value
    data: bytes
    correlation_id: str
    sent_at_ms: int
    attempt: int
    redelivered: bool
    def __init__(self, id: _Optional[int] = ..., to: _Optional[int] = ..., tag: _Optional[str] = ..., body: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., data: _Optional[bytes] = ..., correlation_id: _Optional[str] = ..., sent_at_ms: _Optional[int] = ..., attempt: _Optional[int] = ..., redelivered: _Optional[bool] = ..., **kwargs) -> None: ...

class SendRequest(_message.Message):
    __slots__ = ("to", "to_name", "tag", "body", "data", "correlation_id", "notify_undelivered", "idempotency_key")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TO_NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    to: int
    to_name: str
    tag: str
    body: _struct_pb2.Value
    data: bytes
    correlation_id: str
    notify_undelivered: bool
    idempotency_key: str
    def __init__(self, to: _Optional[int] = ..., to_name: _Optional[str] = ..., tag: _Optional[str] = ..., body: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., data: _Optional[bytes] = ..., correlation_id: _Optional[str] = ..., notify_undelivered: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., **kwargs) -> None: ...

class SendResponse(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    def __init__(self, message_id: _Optional[int] = ...) -> None: ...

class BatchMessage(_message.Message):
    __slots__ = ("tag", "body", "data", "correlation_id", "notify_undelivered", "idempotency_key")
    TAG_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    tag: str
    body: _struct_pb2.Value
    data: bytes
    correlation_id: str
    notify_undelivered: bool
    idempotency_key: str
    def __init__(self, tag: _Optional[str] = ..., body: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., data: _Optional[bytes] = ..., correlation_id: _Optional[str] = ..., notify_undelivered: _Optional[bool] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SendBatchRequest(_message.Message):
    __slots__ = ("to", "to_name", "messages")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TO_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    to: int
    to_name: str
    messages: _containers.RepeatedCompositeFieldContainer[BatchMessage]
    def __init__(self, to: _Optional[int] = ..., to_name: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[BatchMessage, _Mapping]]] = ..., **kwargs) -> None: ...

class SendBatchResponse(_message.Message):
    __slots__ = ("message_ids",)
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, message_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RecvRequest(_message.Message):
    __slots__ = ("pid", "tag", "correlation_id", "timeout_ms", "port_secret", "ack", "lease_ms", "max_messages")
    PID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PORT_SECRET_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    tag: str
    correlation_id: str
    timeout_ms: int
    port_secret: str
    ack: bool
    lease_ms: int
    max_messages: int
    def __init__(self, pid: _Optional[int] = ..., tag: _Optional[str] = ..., correlation_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., port_secret: _Optional[str] = ..., ack: _Optional[bool] = ..., lease_ms: _Optional[int] = ..., max_messages: _Optional[int] = ..., **kwargs) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("pid", "message_id", "message_ids")
    PID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    message_id: int
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pid: _Optional[int] = ..., message_id: _Optional[int] = ..., message_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("settled", "not_leased")
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    NOT_LEASED_FIELD_NUMBER: _ClassVar[int]
    settled: int
    not_leased: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, settled: _Optional[int] = ..., not_leased: _Optional[_Iterable[int]] = ...) -> None: ...

class RecvResponse(_message.Message):
    __slots__ = ("message", "timed_out", "messages")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    message: Message
    timed_out: bool
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, message: _Optional[_Union[Message, _Mapping]] = ..., timed_out: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("pid", "timeout_ms")
    PID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    timeout_ms: int
    def __init__(self, pid: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WaitResponse(_message.Message):
    __slots__ = ("process", "timed_out")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    process: ProcessInfo
    timed_out: bool
    def __init__(self, process: _Optional[_Union[ProcessInfo, _Mapping]] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class KillRequest(_message.Message):
    __slots__ = ("pid", "reason")
    PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pid: int
    reason: str
    def __init__(self, pid: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KillResponse(_message.Message):
    __slots__ = ("already_ended",)
    ALREADY_ENDED_FIELD_NUMBER: _ClassVar[int]
    already_ended: bool
    def __init__(self, already_ended: _Optional[bool] = ...) -> None: ...

class ExitRequest(_message.Message):
    __slots__ = ("pid", "result", "port_secret")
    PID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PORT_SECRET_FIELD_NUMBER: _ClassVar[int]
    pid: int
    result: _struct_pb2.Value
    port_secret: str
    def __init__(self, pid: _Optional[int] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., port_secret: _Optional[str] = ...) -> None: ...

class ExitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenPortRequest(_message.Message):
    __slots__ = ("name", "mailbox", "dead_letter", "max_attempts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    mailbox: int
    dead_letter: int
    max_attempts: int
    def __init__(self, name: _Optional[str] = ..., mailbox: _Optional[int] = ..., dead_letter: _Optional[int] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class OpenPortResponse(_message.Message):
    __slots__ = ("pid", "secret")
    PID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    pid: int
    secret: str
    def __init__(self, pid: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("namespace", "role", "label")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    role: str
    label: str
    def __init__(self, namespace: _Optional[str] = ..., role: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    token: str
    def __init__(self, id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "namespace", "role", "label", "created_at_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    namespace: str
    role: str
    label: str
    created_at_ms: int
    def __init__(self, id: _Optional[str] = ..., namespace: _Optional[str] = ..., role: _Optional[str] = ..., label: _Optional[str] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetNamespaceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class NamespaceInfo(_message.Message):
    __slots__ = ("name", "live_processes", "max_live_processes", "file_bytes", "max_file_bytes", "files", "max_files", "tokens", "memory_bytes", "mailbox_bytes", "caller_role", "weight", "quotas", "use", "reserved")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MAX_LIVE_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_FILES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    CALLER_ROLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    name: str
    live_processes: int
    max_live_processes: int
    file_bytes: int
    max_file_bytes: int
    files: int
    max_files: int
    tokens: int
    memory_bytes: int
    mailbox_bytes: int
    caller_role: str
    weight: int
    quotas: NamespaceQuotas
    use: NamespaceQuotas
    reserved: NamespaceQuotas
    def __init__(self, name: _Optional[str] = ..., live_processes: _Optional[int] = ..., max_live_processes: _Optional[int] = ..., file_bytes: _Optional[int] = ..., max_file_bytes: _Optional[int] = ..., files: _Optional[int] = ..., max_files: _Optional[int] = ..., tokens: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., mailbox_bytes: _Optional[int] = ..., caller_role: _Optional[str] = ..., weight: _Optional[int] = ..., quotas: _Optional[_Union[NamespaceQuotas, _Mapping]] = ..., use: _Optional[_Union[NamespaceQuotas, _Mapping]] = ..., reserved: _Optional[_Union[NamespaceQuotas, _Mapping]] = ...) -> None: ...

class NamespaceQuotas(_message.Message):
    __slots__ = ("memory_bytes", "mailbox_bytes", "kv_bytes", "tokens", "tokens_per_minute")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    mailbox_bytes: int
    kv_bytes: int
    tokens: int
    tokens_per_minute: int
    def __init__(self, memory_bytes: _Optional[int] = ..., mailbox_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ...) -> None: ...

class SetNamespaceRequest(_message.Message):
    __slots__ = ("name", "weight", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    quotas: NamespaceQuotas
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ..., quotas: _Optional[_Union[NamespaceQuotas, _Mapping]] = ...) -> None: ...

class ReadAuditRequest(_message.Message):
    __slots__ = ("limit", "before_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before_id: int
    def __init__(self, limit: _Optional[int] = ..., before_id: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at_ms", "namespace", "who", "method", "target", "outcome")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    id: int
    at_ms: int
    namespace: str
    who: str
    method: str
    target: str
    outcome: str
    def __init__(self, id: _Optional[int] = ..., at_ms: _Optional[int] = ..., namespace: _Optional[str] = ..., who: _Optional[str] = ..., method: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ...) -> None: ...

class ReadAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("pid", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MonitorRequest(_message.Message):
    __slots__ = ("watcher", "target")
    WATCHER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    watcher: int
    target: int
    def __init__(self, watcher: _Optional[int] = ..., target: _Optional[int] = ...) -> None: ...

class MonitorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPriorityRequest(_message.Message):
    __slots__ = ("pid", "priority", "weight")
    PID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    priority: int
    weight: int
    def __init__(self, pid: _Optional[int] = ..., priority: _Optional[int] = ..., weight: _Optional[int] = ...) -> None: ...

class SetPriorityResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadLogRequest(_message.Message):
    __slots__ = ("pid", "offset", "tail", "since_ms")
    PID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    offset: int
    tail: int
    since_ms: int
    def __init__(self, pid: _Optional[int] = ..., offset: _Optional[int] = ..., tail: _Optional[int] = ..., since_ms: _Optional[int] = ...) -> None: ...

class ReadLogResponse(_message.Message):
    __slots__ = ("lines", "next_offset", "dropped", "times_ms", "ended")
    LINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TIMES_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    next_offset: int
    dropped: int
    times_ms: _containers.RepeatedScalarFieldContainer[int]
    ended: bool
    def __init__(self, lines: _Optional[_Iterable[str]] = ..., next_offset: _Optional[int] = ..., dropped: _Optional[int] = ..., times_ms: _Optional[_Iterable[int]] = ..., ended: _Optional[bool] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("states", "name", "parent", "include_ended", "page_size", "after_pid")
    STATES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AFTER_PID_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[ProcessState]
    name: str
    parent: int
    include_ended: bool
    page_size: int
    after_pid: int
    def __init__(self, states: _Optional[_Iterable[_Union[ProcessState, str]]] = ..., name: _Optional[str] = ..., parent: _Optional[int] = ..., include_ended: _Optional[bool] = ..., page_size: _Optional[int] = ..., after_pid: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes", "next_after_pid")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_PID_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    next_after_pid: int
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ..., next_after_pid: _Optional[int] = ...) -> None: ...

class GetProcessRequest(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "name", "parent", "kind", "state", "priority", "limits", "usage", "exit_reason", "result", "error", "started_at_ms", "ended_at_ms", "blocked_on", "namespace", "weight", "result_left_out", "monitors", "monitored_by")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_ON_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESULT_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    MONITORS_FIELD_NUMBER: _ClassVar[int]
    MONITORED_BY_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    parent: int
    kind: ProcessKind
    state: ProcessState
    priority: int
    limits: Limits
    usage: Usage
    exit_reason: str
    result: _struct_pb2.Value
    error: str
    started_at_ms: int
    ended_at_ms: int
    blocked_on: str
    namespace: str
    weight: int
    result_left_out: bool
    monitors: _containers.RepeatedScalarFieldContainer[int]
    monitored_by: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., parent: _Optional[int] = ..., kind: _Optional[_Union[ProcessKind, str]] = ..., state: _Optional[_Union[ProcessState, str]] = ..., priority: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., exit_reason: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[str] = ..., started_at_ms: _Optional[int] = ..., ended_at_ms: _Optional[int] = ..., blocked_on: _Optional[str] = ..., namespace: _Optional[str] = ..., weight: _Optional[int] = ..., result_left_out: _Optional[bool] = ..., monitors: _Optional[_Iterable[int]] = ..., monitored_by: _Optional[_Iterable[int]] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "process", "at_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    process: ProcessInfo
    at_ms: int
    def __init__(self, kind: _Optional[str] = ..., process: _Optional[_Union[ProcessInfo, _Mapping]] = ..., at_ms: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _struct_pb2.Value
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: _struct_pb2.Value
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("pid", "prompt", "messages", "sampling", "stream", "priority", "timeout_ms", "json_schema", "regex", "grammar", "tools", "tool_choice", "context_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sampling: SamplingParams
    stream: bool
    priority: int
    timeout_ms: int
    json_schema: _struct_pb2.Value
    regex: str
    grammar: str
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: str
    context_id: int
    def __init__(self, pid: _Optional[int] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stream: _Optional[bool] = ..., priority: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., json_schema: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., regex: _Optional[str] = ..., grammar: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[str] = ..., context_id: _Optional[int] = ...) -> None: ...

class InferUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class InferChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "tool_calls")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    usage: InferUsage
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[InferUsage, _Mapping]] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ...) -> None: ...

class CreateContextRequest(_message.Message):
    __slots__ = ("pid", "messages", "tools")
    PID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    def __init__(self, pid: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ...) -> None: ...

class ForkContextRequest(_message.Message):
    __slots__ = ("pid", "context_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    context_id: int
    def __init__(self, pid: _Optional[int] = ..., context_id: _Optional[int] = ...) -> None: ...

class DropContextRequest(_message.Message):
    __slots__ = ("pid", "context_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    context_id: int
    def __init__(self, pid: _Optional[int] = ..., context_id: _Optional[int] = ...) -> None: ...

class DropContextResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContextInfo(_message.Message):
    __slots__ = ("context_id", "tokens", "kv_bytes")
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    context_id: int
    tokens: int
    kv_bytes: int
    def __init__(self, context_id: _Optional[int] = ..., tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class WriteFileRequest(_message.Message):
    __slots__ = ("path", "append", "data", "pid")
    PATH_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    path: str
    append: bool
    data: bytes
    pid: int
    def __init__(self, path: _Optional[str] = ..., append: _Optional[bool] = ..., data: _Optional[bytes] = ..., pid: _Optional[int] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ("path", "offset", "length")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    length: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class FilePath(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("path", "size", "is_dir", "modified_ms")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_MS_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    is_dir: bool
    modified_ms: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., is_dir: _Optional[bool] = ..., modified_ms: _Optional[int] = ...) -> None: ...

class ListFilesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FileInfo]
    def __init__(self, entries: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ...) -> None: ...

class DeleteFileResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenameFileRequest(_message.Message):
    __slots__ = ("from_path", "to_path")
    FROM_PATH_FIELD_NUMBER: _ClassVar[int]
    TO_PATH_FIELD_NUMBER: _ClassVar[int]
    from_path: str
    to_path: str
    def __init__(self, from_path: _Optional[str] = ..., to_path: _Optional[str] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("pid", "name", "semaphore", "timeout_ms", "priority")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEMAPHORE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    semaphore: int
    timeout_ms: int
    priority: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., semaphore: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("acquired", "timed_out", "previous_holder_died")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HOLDER_DIED_FIELD_NUMBER: _ClassVar[int]
    acquired: bool
    timed_out: bool
    previous_holder_died: int
    def __init__(self, acquired: _Optional[bool] = ..., timed_out: _Optional[bool] = ..., previous_holder_died: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("pid", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CondWaitRequest(_message.Message):
    __slots__ = ("pid", "name", "lock", "timeout_ms", "priority")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    lock: str
    timeout_ms: int
    priority: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., lock: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class CondWaitResponse(_message.Message):
    __slots__ = ("signalled", "timed_out", "previous_holder_died")
    SIGNALLED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HOLDER_DIED_FIELD_NUMBER: _ClassVar[int]
    signalled: bool
    timed_out: bool
    previous_holder_died: int
    def __init__(self, signalled: _Optional[bool] = ..., timed_out: _Optional[bool] = ..., previous_holder_died: _Optional[int] = ...) -> None: ...

class CondSignalRequest(_message.Message):
    __slots__ = ("name", "pid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    name: str
    pid: int
    def __init__(self, name: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class CondSignalResponse(_message.Message):
    __slots__ = ("woken",)
    WOKEN_FIELD_NUMBER: _ClassVar[int]
    woken: int
    def __init__(self, woken: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("id", "message", "reason", "attempts", "receiver", "dead_at_ms", "detail", "namespace")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    DEAD_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    id: int
    message: Message
    reason: str
    attempts: int
    receiver: int
    dead_at_ms: int
    detail: str
    namespace: str
    def __init__(self, id: _Optional[int] = ..., message: _Optional[_Union[Message, _Mapping]] = ..., reason: _Optional[str] = ..., attempts: _Optional[int] = ..., receiver: _Optional[int] = ..., dead_at_ms: _Optional[int] = ..., detail: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("after_id", "page_size", "receiver")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    page_size: int
    receiver: int
    def __init__(self, after_id: _Optional[int] = ..., page_size: _Optional[int] = ..., receiver: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_after_id", "total", "dropped")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_after_id: int
    total: int
    dropped: int
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_after_id: _Optional[int] = ..., total: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...

class GetDeadLetterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RetryDeadLetterRequest(_message.Message):
    __slots__ = ("id", "to", "to_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TO_NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    to: int
    to_name: str
    def __init__(self, id: _Optional[int] = ..., to: _Optional[int] = ..., to_name: _Optional[str] = ...) -> None: ...

class RetryDeadLetterResponse(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    def __init__(self, message_id: _Optional[int] = ...) -> None: ...

class PurgeDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "all", "before_ms")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    all: bool
    before_ms: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., all: _Optional[bool] = ..., before_ms: _Optional[int] = ...) -> None: ...

class PurgeDeadLettersResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

"""Named errors. Each message says what is wrong and how to fix it."""


class MbnError(Exception):
    """Base class: the CLI prints these without a traceback and exits 2."""


class VersionMismatchError(MbnError):
    pass


class ModelConfigError(MbnError):
    """An alpha, resolution, class count or model name that cannot work."""


class OnnxModelError(MbnError):
    """A malformed, truncated or unsupported ONNX file."""


class UnknownTargetError(MbnError):
    pass


class CrossCompilerMissingError(MbnError):
    pass


class InputShapeError(MbnError):
    pass


class InputDtypeError(MbnError):
    pass


class ArchitectureMismatchError(MbnError):
    """An artifact built for another CPU architecture or device."""


class ArtifactError(MbnError):
    """A missing or inconsistent artifact directory (manifest, checksum)."""


class SelfCheckError(MbnError):
    pass


class TuningError(MbnError):
    """A tune that cannot start: bad budget, space, kernel name, board or tracker."""


class CorruptDatabaseError(MbnError):
    """A tuning database that cannot be used as it is."""


class DatabaseLockedError(MbnError):
    """Another live tune holds the database's lock."""


class ForeignDatabaseError(MbnError):
    """Records tuned for a target whose CPU features the build target lacks."""


class UnknownKernelError(TuningError):
    """`tune --only` names no kernel of the model."""


class InputValueError(MbnError):
    """An argument or input value the model cannot use (a top-k outside 1..classes, NaN pixels)."""


class NonFiniteInputError(InputValueError):
    """NaN or Inf in the input: the compiled max/min activations would turn it into ordinary logits."""


class NonFiniteInputWarning(RuntimeWarning):
    """Non-finite input run with the check off on an artifact that does not propagate NaN."""


class OutputDirError(MbnError):
    """An --out folder that is not ours to replace (user files, the input, the working directory)."""


class WeightsFileError(ModelConfigError):
    """A weights file that is not a state_dict of the chosen model."""


class TargetFileError(UnknownTargetError):
    """A target TOML file with a missing, mistyped or unsupported field."""


class NonFiniteModelError(MbnError):
    """Weights or reference output with NaN/Inf: every board would fail its self-check."""


class LoweringError(MbnError):
    """A failure inside TVM after the ONNX import, with the phase that failed."""


class CudaToolkitMissingError(CrossCompilerMissingError):
    """No CUDA compiler of the major version a target must run on (nvcc or NVRTC from PyPI)."""


class CudaCompileError(MbnError):
    """nvcc or NVRTC rejected the generated CUDA source."""

"""Block-wise weight-only quantization (2/4/8 bits) of MatMul weights and Gather tables:
RTN, HQQ and GPTQ in numpy, emitted as MatMulNBits, block-wise DequantizeLinear or
GatherBlockQuantized."""

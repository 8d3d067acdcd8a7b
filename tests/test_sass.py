"""kernels.sass: loops and the main loop's instruction mix, from cuobjdump -sass text."""

from tunerd.kernels import sass

# Two loops: an outer one (0x0040..0x0100) holding an inner FFMA loop (0x0060..0x00a0), and a later
# loop of MMAs; a trailing self-branch (the end-of-kernel trap) is not a loop.
SASS = """
        Function : conv_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                   /* 0x0000000000007919 */
        /*0040*/                   I2F.U32.RP R5, R4 ;                    /* 0x0000000400057306 */
        /*0050*/                   IMAD.HI.U32 R6, R5, R7, RZ ;           /* 0x0000000705067227 */
        /*0060*/                   FFMA R8, R9, R10, R8 ;                 /* 0x0000000a09087223 */
        /*0070*/                   HFMA2 R11, R12, R13, R11 ;             /* 0x0000000d0c0b7231 */
        /*0080*/                   LDG.E.128 R12, [R2.64] ;               /* 0x000000040202c981 */
        /*0090*/                   ISETP.GE.AND P0, PT, R0, 0x7, PT ;     /* 0x000000070000780c */
        /*00a0*/               @P0 BRA 0x60 ;                             /* 0xfffffffc00000947 */
        /*00b0*/                   IADD3 R0, R0, 0x1, RZ ;                /* 0x0000000100007810 */
        /*0100*/              @!P1 BRA 0x40 ;                             /* 0xfffffff400000947 */
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR16], R56 ;  /* 0x00e00000103879f0 */
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], R56, gsb0 ;  /* 0x00e000000c3879f0 */
        /*0130*/                   UTMALDG.2D [UR8], [UR4] ;              /* 0x0000000804007db4 */
        /*0140*/               @P2 BRA 0x110 ;                            /* 0xfffffffc00000947 */
        /*0150*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0160*/                   BRA 0x160;                             /* 0xfffffffc00fc7947 */
"""


def test_parse_reads_every_instruction_with_its_predicate():
    code = sass.parse(SASS)
    assert [i.addr for i in code][:3] == [0x0, 0x10, 0x40]
    assert len(code) == 17
    bra = code[8]
    assert bra.base == "BRA" and bra.predicated and bra.operands == "0x60"
    assert code[11].base == "HGMMA" and code[11].opcode == "HGMMA.64x64x16.F32.BF16"


def test_loops_are_backward_branches_without_self_branches():
    code = sass.parse(SASS)
    assert sass.loops(code) == [(4, 8), (2, 10), (11, 14)]


def test_main_loop_is_the_innermost_loop_with_the_most_math():
    code = sass.parse(SASS)
    assert sass.main_loop(code) == (11, 14)  # MMAs outrank FMAs; the outer loop is not innermost
    without_mma = [i for i in code if i.addr < 0x110]
    assert sass.main_loop(without_mma) == (4, 8)
    assert sass.main_loop(code[:2]) is None


def test_mix_counts_the_main_loop_and_the_kernel():
    m = sass.mix(sass.parse(SASS))
    assert m == {
        "sass": 17,
        "tma": 1,
        "loop_sass": 4,
        "loop_mma": 2,
        "loop_fma": 0,
        "loop_mma_share": 0.5,
        "loop_fma_share": 0.0,
        "loop_idiv": 0,
        "loop_mulhi": 0,
    }
    inner = sass.mix([i for i in sass.parse(SASS) if i.addr < 0x110])
    assert (inner["loop_sass"], inner["loop_fma"], inner["loop_fma_share"]) == (5, 2, 0.4)
    outer_only = [i for i in sass.parse(SASS) if i.addr < 0x110 and i.addr != 0xA0]  # drop the inner branch
    m = sass.mix(outer_only)
    assert (m["loop_sass"], m["loop_idiv"], m["loop_mulhi"]) == (8, 1, 1)
    assert sass.mix([]) == {"sass": 0, "tma": 0, "loop_sass": None}


# A reduction unrolled whole: three steps of two MMAs each, 4 instructions apart, between a prologue and an
# epilogue, and no loop; one runtime division in the second step.
UNROLLED = "\n".join(
    f"        /*{a:04x}*/                   {op} ;"
    for a, op in enumerate(
        ["S2R R0, SR_CTAID.X", "MOV R1, R2"]
        + ["HGMMA.64x64x16.F32.BF16 R56, gdesc[UR16], R56", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], R56"]
        + ["LDGSTS.E.128 [R3], [R4.64]", "IADD3 R0, R0, 0x1, RZ"]
        + ["HGMMA.64x64x16.F32.BF16 R56, gdesc[UR16], R56", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], R56"]
        + ["I2F.U32.RP R5, R4", "IADD3 R0, R0, 0x1, RZ"]
        + ["HGMMA.64x64x16.F32.BF16 R56, gdesc[UR16], R56", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], R56"]
        + ["STG.E.128 [R2.64], R8", "EXIT"]
    )
)


def test_an_unrolled_reduction_is_measured_per_step_given_its_step_count():
    code = sass.parse(UNROLLED)
    assert sass.main_loop(code) is None and sass.mix(code) == {"sass": 14, "tma": 0, "loop_sass": None}
    assert sass.unrolled(code, 3) == (2, 10)  # first MMA of the first step .. first MMA of the last
    m = sass.mix(code, steps=3)
    assert m["loop_unrolled"] and (m["loop_sass"], m["loop_mma"], m["loop_mma_share"]) == (4, 2, 0.5)
    assert m["loop_idiv"] == 1  # a division in any step counts, never averaged away
    assert sass.unrolled(code, 4) is None and sass.mix(code, steps=4)["loop_sass"] is None  # 6 MMAs, not 4 groups
    assert sass.unrolled(code, 1) is None
    looped = sass.mix(sass.parse(SASS), steps=3)  # a real loop wins over the step count
    assert looped["loop_sass"] == 4 and "loop_unrolled" not in looped


def test_reduction_steps_counts_the_implicit_gemm_loop():
    from dataclasses import replace

    from tunerd.kernels.generator import reduction_steps
    from tunerd.kernels.schedule import Schedule
    from tunerd.kernels.spec import conv_spec

    s = Schedule(block_m=128, block_n=64, block_k=32)
    spec = conv_spec(n=8, c=64, k=48, in_size=(14, 14), kernel=3, padding=1, dtype="bfloat16")
    assert reduction_steps(spec, s) == 9 * 2  # taps x channel blocks
    assert reduction_steps(spec.with_(op="dgrad"), s) == 9 * 2  # stride 1: one phase, every tap; 48 -> 2 blocks
    strided = conv_spec(n=8, c=64, k=48, in_size=(14, 14), kernel=3, padding=1, stride=2, op="dgrad")
    assert reduction_steps(strided, s) == 4 * 2  # the largest phase's 2x2 taps
    assert reduction_steps(spec.with_(op="wgrad"), s) is None
    assert reduction_steps(spec, replace(s, split_k=2)) is None  # runtime loop bounds: a loop is always left
    assert reduction_steps(spec, replace(s, stream_k=8)) is None
    dw = conv_spec(n=8, c=64, k=64, in_size=(14, 14), kernel=7, padding=3, groups=64)
    assert reduction_steps(dw, s) is None

"""Train the demo model's tokenizer and write the shipped files next to this script.

    python -m flatout.assets.demo.build_tokenizer

Deterministic: the corpus is `corpus.txt` (hand-written) plus synthetic text from a fixed-seed
generator, and the `tokenizers` BPE trainer breaks ties deterministically, so running this again
reproduces `tokenizer.json`. The tokenizer is a GLM-4-0414-style byte-level BPE (GLM-4's
pre-tokenizer regex) of 4096 ids: 4084 trained, then GLM's special tokens plus `<think>` and
`</think>` at the end, as GLM-4 places its specials after the base vocabulary.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from flatout.tokenizers.loader import GLM4_PATTERN
from flatout.tokenizers.templates import DEMO_CHAT_TEMPLATE

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 4096
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)  # fmt: skip
# Added like GLM-Z1's: visible in decoded text (not special), so reasoning parsers can see them.
THINK_TOKENS = ("<think>", "</think>")
MODEL_MAX_LENGTH = 2048

_EN_SUBJECTS = (
    "The server", "A small model", "My neighbour", "The scheduler", "Every request", "The teacher",
    "Our team", "The old cat", "This function", "The train", "A student", "The cache",
)  # fmt: skip
_EN_VERBS = (
    "reads", "writes", "finds", "sends", "keeps", "measures", "loads", "counts", "paints",
    "answers", "builds", "checks", "opens", "moves", "prints", "returns",
)  # fmt: skip
_EN_OBJECTS = (
    "the tokens", "a long letter", "every block", "the blue door", "three apples", "the results",
    "a new table", "the weights", "the morning news", "a short poem", "the first answer",
)  # fmt: skip
_EN_TAILS = (
    "before lunch.", "very quickly.", "without a sound.", "every Monday.", "in the garden.",
    "at the end of the day.", "on the GPU.", "again and again.", "for the second time.",
)  # fmt: skip
_ZH_SUBJECTS = ("我们", "老师", "这个模型", "服务器", "小明", "妈妈", "学生们", "调度器", "朋友")
_ZH_VERBS = ("喜欢", "需要", "正在处理", "读完了", "写下了", "发现了", "计算了", "打开了", "准备了")
_ZH_OBJECTS = (
    "一本新书", "所有的请求", "晚饭", "这道数学题", "一封长信", "很多词元", "今天的新闻",
    "窗外的风景", "下一步的计划", "显存里的数据",
)  # fmt: skip
_ZH_TAILS = ("。", "，然后休息了一会儿。", "，大家都很高兴。", "，速度非常快。", "？", "！")
# Frequent words and characters, composed at random so that the vocabulary covers more of them.
_EN_WORDS = (
    "about above across after again against almost alone along already also always among animal "
    "another answer around asked away back because become before began behind being below best "
    "better between big black blue body book both bring brother brought build built business "
    "called came care carry cause center change children city close cold color come common "
    "complete could country course cover cross dark daughter deep different direction distance "
    "does door down draw during each early earth east easy enough even evening every example "
    "family father feel field figure finally fire first fish five follow food foot force form "
    "found four free friend front full game garden gave general girl give good govern great "
    "green ground group grow half hand happen hard have head hear heard heart heavy help here "
    "high himself hold home horse hour house however hundred idea important inside island "
    "itself keep kind king knew know land language large last later laugh learn leave left "
    "letter life light line list little live long look machine made main make many mark matter "
    "mean measure might mind minute miss money moon more morning most mother mountain move much "
    "music must name near need never next night north nothing notice number object ocean often "
    "order other outside over page paper part pass past people perhaps person picture piece "
    "place plan plant play point power press problem product pull question quick rain reach "
    "ready real reason record remember rest river road rock room round rule same school science "
    "season second seem sentence several shape short should show side simple since sing size "
    "sleep slowly small snow song soon sound south space special spring stand star start state "
    "still stood stop story street strong study such summer surface system table take talk "
    "teach tell than their them then there these thing think those though thought thousand "
    "through time today together told took top toward travel tree true turn under until upon "
    "usual very voice vowel walk wall want warm watch water weather week weight well went were "
    "west what wheel where which while white whole wind window winter with without woman wonder "
    "wood word work world would write year young"
).split()
_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
    "数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提"
    "直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计"
    "别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海"
    "口东导器压志世金增争济阶油思术极交受联什认六共权收证改清美再采转更单风切打白教速花带安场身车"
    "例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记"
    "需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省"
    "列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼"
)


_CODE_VERBS = ("get", "set", "load", "save", "build", "parse", "update", "compute", "check")
_CODE_NOUNS = ("config", "tokens", "block", "request", "cache", "weights", "batch", "output")
_CODE_TYPES = ("int", "str", "float", "bool", "list[int]", "dict[str, int]", "None")


def synthetic_corpus(seed: int = 0) -> Iterator[str]:
    """Fixed-seed generated lines: English and Chinese sentences, numbers, code, JSON."""
    rng = random.Random(seed)
    for _ in range(2500):
        yield " ".join(
            rng.choice(words) for words in (_EN_SUBJECTS, _EN_VERBS, _EN_OBJECTS, _EN_TAILS)
        )
    for _ in range(2500):
        yield "".join(
            rng.choice(words) for words in (_ZH_SUBJECTS, _ZH_VERBS, _ZH_OBJECTS, _ZH_TAILS)
        )
    for _ in range(3000):
        yield " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
        yield "".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(4, 16))) + "。"
    for _ in range(1500):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        yield f"{a} + {b} = {a + b}; {a} * {b} = {a * b}; {a / max(b, 1):.3f}"
        yield (
            f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        )
    for _ in range(1200):
        verb, noun, kind = rng.choice(_CODE_VERBS), rng.choice(_CODE_NOUNS), rng.choice(_CODE_TYPES)
        yield (
            f"    def {verb}_{noun}(self, {noun}_id: int, *, strict: bool = False) -> {kind}:\n"
            f'        """{verb.capitalize()} the {noun}."""\n'
            f"        if {noun}_id < 0:\n"
            f'            raise ValueError(f"bad {noun} id: {{{noun}_id}}")\n'
            f"        return self._{noun}s[{noun}_id]\n"
        )
        yield json.dumps({"id": rng.randint(0, 99999), noun: verb, "ok": rng.random() < 0.5})


def training_texts() -> Iterator[str]:
    yield from (HERE / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    yield from synthetic_corpus()


def train_demo_tokenizer() -> Tokenizer:
    """Train the demo tokenizer (same result on every run)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    num_trained = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=num_trained,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    if tokenizer.get_vocab_size() != num_trained:
        raise RuntimeError(
            f"the corpus gave {tokenizer.get_vocab_size()} tokens, expected {num_trained}"
        )
    tokenizer.add_special_tokens(
        [AddedToken(content, special=True, normalized=False) for content in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens(
        [AddedToken(content, special=False, normalized=False) for content in THINK_TOKENS]
    )
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json of the demo checkpoint (the chat template is chat_template.jinja)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "extra_special_tokens": list(SPECIAL_TOKENS[1:]),
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def write_tokenizer_files(folder: Path) -> None:
    tokenizer = train_demo_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
    (folder / "chat_template.jinja").write_text(DEMO_CHAT_TEMPLATE, encoding="utf-8")


if __name__ == "__main__":
    write_tokenizer_files(HERE)
    print(f"wrote tokenizer.json, tokenizer_config.json, chat_template.jinja to {HERE}")

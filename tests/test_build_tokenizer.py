"""A tokenizer built in-process loads with the official-layout loader and tokenises templates."""
from internvl_jax.data.build_tokenizer import build_tokenizer
from internvl_jax.data.conversation import get_template, preprocess
from internvl_jax.data.tokenizer import load_tokenizer


def test_built_tokenizer_round_trips_a_chat_sample(tmp_path):
    corpus = [f"<|im_start|>user\nhow many circles are there {i}?<|im_end|><|im_start|>assistant\n{i % 7}<|im_end|>"
              for i in range(200)]
    tokenizer = load_tokenizer(build_tokenizer(corpus, tmp_path / "tok", vocab_size=300))
    context = tokenizer.token_to_id("<IMG_CONTEXT>")
    assert context >= 300 - 10 and tokenizer.vocab_size <= 300 + 9
    sample = preprocess([{"from": "human", "value": "<image>\nhow many circles?"}, {"from": "gpt", "value": "3"}],
                        tokenizer, get_template("internlm2-chat"), [4], max_length=256)
    ids = sample["input_ids"].tolist()
    assert ids[0] == tokenizer.bos_id and ids.count(context) == 4
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert "how many circles?" in text and text.endswith("3<|im_end|>")

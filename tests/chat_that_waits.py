"""`vlkit chat`, except that the first reply to a message holding WAIT_MARK cannot finish before Ctrl-C.

Its generation starts only once Ctrl-C has set the reply's stop flag, so the pseudo-terminal test of
stopping a reply has no race with a reply that ends first, however loaded the machine is.
"""

from __future__ import annotations

import sys

import vlkit.chat.session as session
from vlkit.cli import main

WAIT_MARK = "Wait for Ctrl-C."
WAITING = "[waiting for Ctrl-C]"  # shown as reply text, by the REPL's reading loop that Ctrl-C interrupts
real_stream_generate = session.stream_generate
waited = False


def stream_generate(model, inputs, tokenizer, generate_kwargs, **kwargs):
    global waited
    if waited or WAIT_MARK not in tokenizer.decode(inputs["input_ids"][0]):
        return real_stream_generate(model, inputs, tokenizer, generate_kwargs, **kwargs)
    waited = True

    class GeneratesAfterCtrlC:
        def generate(self, **generate_inputs):
            stop_flag = generate_inputs["stopping_criteria"][0]
            # Printed from inside the loop that catches Ctrl-C: once it shows, a Ctrl-C is never early.
            generate_inputs["streamer"].text_queue.put(WAITING)
            stop_flag.event.wait(timeout=600)  # set by the REPL when Ctrl-C arrives
            return model.generate(**generate_inputs)

    return real_stream_generate(GeneratesAfterCtrlC(), inputs, tokenizer, generate_kwargs, **kwargs)


session.stream_generate = stream_generate

if __name__ == "__main__":
    sys.exit(main())
